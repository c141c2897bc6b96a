"""The shared ground every other package stands on: errors, atomic writes, hashing, validated documents, the
registry, terminal output, fail-closed gates and where files live. It imports nothing else of edgedistill."""

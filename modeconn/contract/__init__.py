"""What training and serving share: the error base, the manifest model, the artifact reader,
file hashing, the BentoML store, and the hold points where tests stop a process. Imports no
torch, so the serving image stays small."""

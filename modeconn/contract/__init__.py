"""What training and serving share: the error base, the manifest model, the artifact reader,
file hashing and the BentoML store. Imports no torch, so the serving image stays small."""

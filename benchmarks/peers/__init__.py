"""The peers `benchmarks/serving_peers.py` serves the same ensemble graph with.

Each module is a minimal server of its framework, configured from PEER_* environment
variables the benchmark sets: PEER_ARTIFACT (an exported artifact folder), PEER_WORKERS,
PEER_ORT_THREADS, PEER_ORT_SPINNING, PEER_MAX_BATCH_ROWS. They answer what modeconn's
/predict answers (serving.runtime.summarize of the ensemble outputs), so the response bodies
cost the same to build and to send.
"""

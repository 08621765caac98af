"""The search API: FastAPI app that encodes queries on the fly and searches the published index."""

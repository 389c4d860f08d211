"""Preprocessing worker: Redis job stream -> Pillow -> TF Serving Predict over gRPC -> Redis results."""

"""HTTP gateway: image uploads in, Redis jobs out, results back. Needs no TensorFlow."""

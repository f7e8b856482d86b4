"""Online serving on Ray Serve: an HTTP ingress in front of engine replicas (see `pipelines.serving.app`)."""

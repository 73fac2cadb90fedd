"""xma2 on Ray Serve: the application (:mod:`server.ray.app`), its chip replicas
(:mod:`server.ray.replica`) and its HTTP ingress (:mod:`server.ray.gateway`)."""

"""vallexd on Ray Serve (the `ray` extra): replicas of the model behind the daemon's HTTP API.

ray.py starts it (`vallexd-ray`), ingress.py is the HTTP side, replica.py the model side.
"""

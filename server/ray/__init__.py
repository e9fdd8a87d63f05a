"""ddpm-serve on Ray Serve: the same API, engine replicas across devices and nodes.

    ddpm-serve --backend ray --replicas 2          # or --min-replicas 1 --max-replicas 4

deploy.py builds the application (ingress, replicas, board) and runs it; ingress.py is our
FastAPI app over remote.RemoteEngine, the ingress's EngineClient; replica.py runs the Engine
on one device; board.py is where replicas post their state. Needs `pip install ddpm-serve[ray]`.
"""

"""gRPC servicers (one per proto service), auth and the error→status table. Thin: translate and delegate."""

"""`balancer demo`: the demo command, its pure-Python backend and the Node.js demo app."""

"""`python -m balancer` is the `balancer` command."""

from .cli import entry

entry()

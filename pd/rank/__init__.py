"""One engine rank inside a splitwise (Redis) cluster: its loop, and the prefill and
decode halves of the KV hand-off (DESIGN.md "The splitwise request path")."""

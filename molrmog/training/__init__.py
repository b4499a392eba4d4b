"""Training: the one training loop (`train`), the intra-op threads it takes from the machine's load (`threads`)
and where independent tasks run (`executors`). Imports only `molrmog.core`."""

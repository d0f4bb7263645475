"""The training library behind train.py: optimizer, loss, sharded state, train step."""

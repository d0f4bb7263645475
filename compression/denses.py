"""Walking the layers' Dense modules of a param tree, shared by pruning, low rank and
quantization: each visits `params["layers"][module][name]` (e.g. attn/query, mlp/wo) and
rebuilds the tree with the leaves it changed, leaving everything else as it was."""


def denses(params):
    """(module, Dense name, its leaves) of every Dense under "layers", e.g. ("attn",
    "query", {"kernel": ..., "bias": ...}); norms (no kernel) are skipped."""
    for module, children in params["layers"].items():
        for name, leaves in children.items():
            if isinstance(leaves, dict) and {"kernel", "kernel_a"} & set(leaves):
                yield module, name, leaves


def map_denses(params, change):
    """`params` with each Dense's leaves replaced by `change(module, name, leaves)`."""
    layers = {module: dict(children) for module, children in params["layers"].items()}
    for module, name, leaves in denses(params):
        layers[module][name] = change(module, name, leaves)
    return dict(params, layers=layers)

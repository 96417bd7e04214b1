"""TEMPORARY placeholder: replaced by the real solver before anything lands."""


def sparsegpt_prune(*args, **kwargs):
    raise NotImplementedError("sparsegpt_prune is being written")

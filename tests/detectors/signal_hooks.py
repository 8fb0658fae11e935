"""A detector builder whose model signals its own process during a chosen training iteration: a preemption at a
known point, for the tests of stopping on SIGTERM/SIGINT (also imported by their torchrun launcher)."""

import os
import signal

import detectors.engine.train as engine


def signalling_builder(iteration: int, signum: int = signal.SIGTERM, rank: int | None = None):
    """``engine.build_detector`` whose model sends ``signum`` to its process at the start of the forward pass of
    the 1-based training ``iteration``; only in the process of that ``rank`` when one is given."""
    build = engine.build_detector

    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = []

        def hook(module, inputs):
            calls.append(1)
            here = rank is None or os.environ.get("RANK") == str(rank)
            if module.training and len(calls) == iteration and here:
                signal.raise_signal(signum)

        model.register_forward_pre_hook(hook)
        return model

    return build_and_hook

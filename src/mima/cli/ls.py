"""`mima ls`: list the registered immunizers, attacks, image encoders and metrics."""

from __future__ import annotations

import argparse

_KINDS = ("immunizers", "attacks", "simulated-attackers", "encoders", "metrics")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ls", help="list registered immunizers, attacks, simulated attackers, encoders and metrics")
    parser.add_argument("kind", nargs="?", choices=_KINDS, help="what to list (default: everything)")
    parser.set_defaults(func=_ls)


def _ls(args: argparse.Namespace) -> None:
    kinds = [args.kind] if args.kind else list(_KINDS)
    for index, kind in enumerate(kinds):
        if len(kinds) > 1:
            print(("\n" if index else "") + f"{kind}:")
        for line in _lines(kind):
            print(("  " if len(kinds) > 1 else "") + line)


def _lines(kind: str) -> list[str]:
    if kind in ("immunizers", "attacks", "simulated-attackers"):
        if kind == "immunizers":
            from mima.immunize import immunizers as registry
        elif kind == "attacks":
            from mima.attacks import attacks as registry
        else:
            from mima.immunize.attackers import simulated_attackers as registry
        classes = {name: registry.get(name) for name in registry.names()}
        return [f"{name:<20} {_summary(cls)}{_defaults(cls)}" for name, cls in classes.items()]
    if kind == "encoders":
        from mima.evaluate.encoders import encoders

        return encoders.names()
    from mima.evaluate.metrics import metrics

    return [f"{name:<24} {'higher' if metrics.get(name).higher_is_better else 'lower'} is better"
            for name in metrics.names()]


def _defaults(cls: type) -> str:
    """An attack's declared defaults (see `Attack.settings`), a simulated attacker's learning rate; nothing for an
    immunizer."""
    if not hasattr(cls, "default_steps"):
        return f" (default lr {cls.default_lr:g})" if hasattr(cls, "default_lr") else ""
    return f" (defaults: {cls.default_steps} steps, lr {cls.default_lr:g}; on a real model {cls.reference_lr:g})"


def _summary(cls: type) -> str:
    """First line of the class docstring, else of its module's docstring."""
    import sys

    for doc in (cls.__doc__, sys.modules[cls.__module__].__doc__):
        if doc and doc.strip():
            return doc.strip().splitlines()[0]
    return ""

"""The hooks a plugin can implement. Every built-in feature is a plugin using exactly these.

Registration hooks receive a ``register`` callback (the tox/llm pattern): a plugin module usually ends in
one hookimpl that calls ``register(SomeClass)`` for each thing it adds. The toolkit calls each plugin's
implementation separately, so a failure is reported with that plugin's name and, if the embedding asked
for it, skipped without losing the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "ortq"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate plugin functions with this: ``@ortq.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def ortq_register_op_quantizers(register: Register) -> None:
    """Add op quantizers: classes that plan how one ONNX op family is quantized.

    Call ``register(cls, replace=False)`` for each :class:`ortq.OpQuantizer` subclass. The class lists the
    op types it handles in ``op_types`` (and a non-default ``domain`` if needed). Registering an op type
    that another plugin already registered is an error unless ``replace=True``, in which case the
    later registration wins. Since 0.1.
    """


@hookspec
def ortq_register_calibrators(register: Register) -> None:
    """Add calibrators: ways of reducing observed statistics to a quantization range.

    Call ``register(cls, replace=False)`` for each :class:`ortq.Calibrator` subclass; its lowercase
    ``name`` is what users pass as ``--calibrate-method``/``calibrate_method``. Since 0.1.
    """


@hookspec
def ortq_register_backends(register: Register) -> None:
    """Add target backends: deployment targets that constrain the scheme and export artifacts.

    Call ``register(cls, replace=False)`` for each :class:`ortq.Backend` subclass; its lowercase ``name``
    is what users pass as ``--target``. Since 0.1.
    """


@hookspec
def ortq_register_metrics(register: Register) -> None:
    """Add metrics: streaming scores that ``ortq evaluate`` reports for the float and the quantized model.

    Call ``register(cls, replace=False)`` for each :class:`ortq.Metric` subclass; its lowercase ``name`` is
    what users pass as ``--metric``/``metrics=``. The accuracy-driven quantization scores trial models
    with the same classes. Since 0.2.
    """


@hookspec
def ortq_register_commands(cli: "click.Group") -> None:
    """Add commands to the ``ortq`` command line: ``cli.command()`` / ``cli.add_command(...)``.

    Called only by the CLI, after the built-in commands exist. Since 0.1.
    """

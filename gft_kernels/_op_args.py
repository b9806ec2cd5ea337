"""Custom-op arguments, declared once per op.

A ``torch.library`` op takes a flat list of tensors and scalars, in a fixed order; the
Python around it wants names and groups (``RowParams``). An op's *declaration* is a
frozen dataclass deriving from :class:`OpArgs`: its fields, in the op's order, with their
types. A field typed by another dataclass is a *group*: the group's own fields stand in
its place in the flat list (``params: RowParams`` is the op's ``tau, temperature,
logit_scale, logit_softcap, ignore_index``), and the declaration holds the group rebuilt.

Everything positional is derived from the declaration: the op's schema
(:func:`custom_op` gives ``torch.library`` a signature to infer it from), the binding of
the flat inputs by name (the implementation, the fake and ``setup_context`` receive the
declaration: :func:`bind_inputs`, :meth:`OpArgs.bind`), the flat values of a call
(:meth:`OpArgs.flat`) and a backward's one-gradient-per-input tuple
(:meth:`OpArgs.gradients`). Adding an option is one field in one declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import torch

_Declaration = TypeVar("_Declaration", bound="OpArgs")
# A declaration's field: its name, and for a group the group's class and field names.
_Field = Tuple[str, Optional[Callable[..., object]], Tuple[str, ...]]


def _field_types(cls: type) -> Dict[str, object]:
    """The fields a class declares (bases first, class variables left out) and their
    evaluated types, in order: a dataclass's fields, also before ``@dataclass`` ran."""
    return {
        name: kind
        for name, kind in typing.get_type_hints(cls).items()
        if typing.get_origin(kind) is not ClassVar
    }


class OpArgs:
    """Base of an op's declaration (the subclass is a frozen dataclass; see the module).

    ``_layout`` holds, per field in order, its name and, for a group, the group's class
    and field names; ``_flat_types`` the op's flat arguments and their types. Both are
    computed once, when the subclass is created, so that a call traced by torch.compile
    reads constants.
    """

    _layout: ClassVar[Tuple[_Field, ...]] = ()
    _flat_types: ClassVar[Tuple[Tuple[str, object], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        layout: List[_Field] = []
        flat_types: List[Tuple[str, object]] = []
        for name, kind in _field_types(cls).items():
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                members = _field_types(kind)
                layout.append((name, kind, tuple(members)))
                flat_types.extend(members.items())
            else:
                layout.append((name, None, ()))
                flat_types.append((name, kind))
        names = [name for name, _ in flat_types]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__}: the op's flat argument names repeat: {names}")
        cls._layout = tuple(layout)
        cls._flat_types = tuple(flat_types)

    @classmethod
    def flat_names(cls) -> Tuple[str, ...]:
        """The op's arguments, in schema order."""
        return tuple(name for name, _ in cls._flat_types)

    @classmethod
    def signature(cls, returns: object) -> inspect.Signature:
        """The Python signature ``torch.library`` infers the op's schema from."""
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature(
            [inspect.Parameter(name, kind, annotation=t) for name, t in cls._flat_types],
            return_annotation=returns,
        )

    @classmethod
    def bind(cls: Type[_Declaration], inputs: Sequence[object]) -> _Declaration:
        """The declaration of an op call from its flat inputs (schema order)."""
        if len(inputs) != len(cls._flat_types):
            raise TypeError(
                f"{cls.__name__}: expected {len(cls._flat_types)} op inputs, got {len(inputs)}"
            )
        values = iter(inputs)
        fields = {}
        for name, group, members in cls._layout:
            if group is None:
                fields[name] = next(values)
            else:
                fields[name] = group(**{member: next(values) for member in members})
        return cls(**fields)

    def flat(self) -> Tuple[object, ...]:
        """The op's flat inputs, in schema order: ``op(*args.flat())``."""
        values = []
        for name, group, members in self._layout:
            value = getattr(self, name)
            if group is None:
                values.append(value)
            else:
                for member in members:
                    values.append(getattr(value, member))
        return tuple(values)

    @classmethod
    def select(cls, flat_values: Sequence[object], names: Sequence[str]) -> Tuple[object, ...]:
        """The entries of a per-input sequence (``ctx.needs_input_grad``) for ``names``."""
        order = cls.flat_names()
        return tuple(flat_values[order.index(name)] for name in names)

    @classmethod
    def gradients(cls, **grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """A backward's result: one gradient per flat input, None for the inputs not named."""
        order = cls.flat_names()
        unknown = set(grads) - set(order)
        if unknown:
            raise TypeError(f"{cls.__name__}: no op input named {sorted(unknown)}")
        return tuple(grads.get(name) for name in order)


def _plain(result: object) -> object:
    """A NamedTuple of outputs as the plain tuple the op's schema returns."""
    return tuple(result) if isinstance(result, tuple) else result


def bind_inputs(
    declaration: Type[_Declaration],
) -> Callable[[Callable[[_Declaration], object]], Callable[..., object]]:
    """``fn(args)`` as a function of the op's flat inputs (for ``register_fake``)."""

    def wrap(fn: Callable[[_Declaration], object]) -> Callable[..., object]:
        @functools.wraps(fn)
        def on_flat_inputs(*inputs: object) -> object:
            return _plain(fn(declaration.bind(inputs)))

        return on_flat_inputs

    return wrap


def _schema_returns(returns: object) -> object:
    """An implementation's return type as ``torch.library`` reads it: a NamedTuple of
    outputs becomes the tuple of its field types, ``-> None`` stays None."""
    if returns is type(None):
        return None
    if isinstance(returns, type) and issubclass(returns, tuple) and hasattr(returns, "_fields"):
        return Tuple[tuple(_field_types(returns).values())]
    return returns


def custom_op(
    name: str, declaration: Type[_Declaration], *, mutates_args: Sequence[str] = ()
) -> Callable[[Callable[[_Declaration], object]], Any]:
    """``torch.library.custom_op`` for ``impl(args: declaration) -> outputs``.

    The op's schema lists the declaration's flat arguments (names and types) and the
    implementation's return type (a NamedTuple of outputs is returned as a plain tuple).
    Returns the ``CustomOpDef``, called with the flat inputs: ``op(*args.flat())``.
    """

    def define(impl: Callable[[_Declaration], object]) -> Any:
        on_flat_inputs = bind_inputs(declaration)(impl)
        returns = _schema_returns(typing.get_type_hints(impl)["return"])
        on_flat_inputs.__signature__ = declaration.signature(returns)  # type: ignore[attr-defined]
        return torch.library.custom_op(name, on_flat_inputs, mutates_args=tuple(mutates_args))

    return define

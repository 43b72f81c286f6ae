"""
rosbags message dataclasses -> rclpy message objects, generically, by walking the fields.

rclpy and the message packages are imported lazily, when a type is first converted.  Classes are
found by type name (``pkg/msg/Type`` -> ``pkg.msg.Type``) and cached in a registry; a type with
no importable class raises :class:`UnknownTypeError` (callers skip and count it).  Custom
converters can be registered per type name for types that need special handling.

Field mapping (rosbags -> rclpy): nested messages recurse; numeric arrays (numpy in rosbags)
become ``array.array`` for sequences and numpy arrays of the declared dtype for fixed-size
arrays, copied in one block (an image's ``data`` costs one memcpy); ``byte`` fields become
``bytes``; lists of messages, strings or booleans are converted element by element.
"""

import array
import importlib

import numpy as np


class ConversionError(ValueError):
    """A message whose fields do not fit the rclpy class (text names the field)."""


class UnknownTypeError(ConversionError):
    """No rclpy message class for a type name (its package is not installed)."""


def rclpy_class_name(msgtype):
    """Split ``pkg/msg/Type`` (or ``pkg/Type``) into module and class names."""
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise UnknownTypeError(f'malformed message type name {msgtype!r}')
    return '.'.join(parts[:2]), parts[2]


class MessageConverter:
    """Registry of rclpy classes (and custom converters) by type name, and the converter."""

    def __init__(self):
        self._classes = {}
        self._custom = {}

    def register(self, msgtype, func):
        """Use ``func(rosbags_msg, converter) -> rclpy message`` for ``msgtype``."""
        self._custom[msgtype] = func

    def rclpy_class(self, msgtype):
        """Return the rclpy class of ``msgtype``; :class:`UnknownTypeError` if not importable."""
        if msgtype in self._classes:
            cls = self._classes[msgtype]
        else:
            module, name = rclpy_class_name(msgtype)
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                cls = None
            self._classes[msgtype] = cls
        if cls is None:
            raise UnknownTypeError(f'no rclpy message class for {msgtype} '
                                   f'(is its package installed and sourced?)')
        return cls

    def known(self, msgtype):
        try:
            self.rclpy_class(msgtype)
        except UnknownTypeError:
            return msgtype in self._custom
        return True

    def convert(self, msg, msgtype=None):
        """Convert a rosbags message (``msgtype`` defaults to its ``__msgtype__``)."""
        msgtype = msgtype or getattr(msg, '__msgtype__', None)
        if msgtype is None:
            raise ConversionError(f'{type(msg).__name__} is not a rosbags message')
        custom = self._custom.get(msgtype)
        if custom is not None:
            return custom(msg, self)
        return self._fill(self.rclpy_class(msgtype)(), msg, msgtype)

    def _fill(self, out, msg, msgtype):
        for name in out.get_fields_and_field_types():
            try:
                value = getattr(msg, name)
            except AttributeError:
                raise ConversionError(f'{msgtype}: field {name!r} missing') from None
            default = getattr(out, name)
            try:
                setattr(out, name, self._value(value, default, type(out), name))
            except (AssertionError, TypeError, ValueError, OverflowError) as exc:
                if isinstance(exc, ConversionError):
                    raise
                raise ConversionError(f'{msgtype}.{name}: {type(exc).__name__}: {exc}') from None
        return out

    def _value(self, value, default, owner, name):
        if hasattr(value, '__msgtype__'):
            return self._fill(type(default)(), value, value.__msgtype__)
        if isinstance(default, array.array):
            data = np.ascontiguousarray(value, dtype=np.dtype(default.typecode))
            out = array.array(default.typecode)
            out.frombytes(data.tobytes())
            return out
        if isinstance(default, np.ndarray):
            return np.array(value, dtype=default.dtype).reshape(default.shape)
        if isinstance(default, list):
            return [self._element(v, owner, name) for v in value]
        if isinstance(default, bytes) and not isinstance(value, bytes):
            return bytes([int(value)])
        if isinstance(default, bool):
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return value

    def _element(self, value, owner, name):
        if hasattr(value, '__msgtype__'):
            return self.convert(value)
        kind = _element_kind(owner, name)
        if kind == 'octet':
            return value if isinstance(value, bytes) else bytes([int(value)])
        if kind == 'boolean':
            return bool(value)
        if isinstance(value, np.generic):
            return value.item()
        return value


def _element_kind(owner, name):
    """Return the basic type name of a list field's elements ('octet', ...) or None."""
    names = list(owner.get_fields_and_field_types())
    slot = owner.SLOT_TYPES[names.index(name)]
    return getattr(getattr(slot, 'value_type', None), 'typename', None)

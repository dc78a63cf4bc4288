"""The tensors of a TorchScript archive (OpenAI's CLIP downloads), read without running it.

torch.jit.load executes the archive's code (a `__setstate__`, for one), and
torch.load(weights_only=True) refuses TorchScript archives. So data.pkl is
unpickled here with an allow-list of exactly three names: module objects
(`__torch__.*`, which only collect their attributes), the storage types and
torch's tensor rebuild function, both mapped to NumPy. Nothing else can be
named, so nothing in the file can run. Which attributes are parameters or
buffers (not e.g. a cached attention mask) is read from the `__parameters__`
and `__buffers__` lines of the archive's code, as text.
"""
import pickle
import re
import zipfile

import jax.numpy as jnp
import numpy as np


_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
           "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_CLASS = re.compile(r"^class (\w+)\(Module\):\n  __parameters__ = \[(.*?)\]\n  __buffers__ = \[(.*?)\]", re.M)


class NotReadable(Exception):
    """The archive stores something other than plain module attributes (e.g. a __setstate__ state)."""


def is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _Module:
    """A `__torch__.X` object: its class name and attributes, nothing more."""
    class_name, state = "", None

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *_):
    size, stride = tuple(size), tuple(stride)
    if (len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride)
            or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage))):
        raise NotReadable(f"a tensor of shape {size} reaches outside its storage")  # as_strided does not check
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data, read_storage):
        super().__init__(data)
        self._read_storage = read_storage

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_Module,), {"class_name": f"{module}.{name}"})
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise NotReadable(f"the archive names {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise NotReadable(f"unknown persistent id {kind!r}")
        return np.frombuffer(self._read_storage(key), dtype=dtype)


def read_torchscript_tensors(path):
    """{"a.b.weight": array} of the parameters and buffers; NotReadable when it cannot be done safely."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/")[0]
        members = {}
        for name in names:  # code/__torch__/a/b.py holds the classes of module __torch__.a.b
            if name.startswith(f"{root}/code/") and name.endswith(".py"):
                module = name[len(f"{root}/code/"):-3].replace("/", ".")
                members.update((f"{module}.{m.group(1)}", m.group(2) + m.group(3))
                               for m in _CLASS.finditer(archive.read(name).decode("utf-8", "replace")))
        try:
            module = _Unpickler(archive.open(f"{root}/data.pkl"),
                                lambda key: archive.read(f"{root}/data/{key}")).load()
        except NotReadable:
            raise
        except Exception as err:  # a damaged pickle raises many types
            raise NotReadable(f"{type(err).__name__}: {err}") from None
    out = {}

    def walk(obj, prefix):
        if not isinstance(obj, _Module) or not isinstance(obj.state, dict):
            raise NotReadable(f"{prefix or 'the root module'} keeps a custom state (a __setstate__)")
        tensor_names = set(re.findall(r'"(\w+)"', members.get(obj.class_name, "")))
        for key, value in obj.state.items():
            if isinstance(value, _Module):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, np.ndarray) and key in tensor_names:
                out[prefix + key] = value

    walk(module, "")
    if not out:
        raise NotReadable("no parameters found")
    return out

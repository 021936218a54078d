"""Stand-ins for ComfyUI's runtime modules, so tests import and run the pack the way ComfyUI does, without ComfyUI.

:func:`install` puts ``folder_paths``, ``comfy``, ``comfy.utils``, ``comfy.model_management`` and ``comfy.sd`` into
``sys.modules`` (plus ``server`` with ``PromptServer.instance``). They behave like ComfyUI's own where the pack relies
on it (the folder API; ``ProgressBar``, whose every update runs ComfyUI's progress hook and so raises
``InterruptProcessingException`` once Cancel was pressed; the interrupt flag that
``throw_exception_if_processing_interrupted`` clears; safetensors loading) and record every call the pack makes,
so tests can assert on them. :func:`load_pack` imports the repository root ``__init__.py`` as a
package, exactly like ComfyUI's ``load_custom_node``; :func:`node_info` turns a node class into the entry
``GET /object_info`` would list for it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "crucible_pack"
# ComfyUI 0.8.0's registration: "diffusion_models" lists models/unet first; "unet" and "clip" are legacy aliases.
MODEL_FOLDERS = {"checkpoints": ("checkpoints",), "loras": ("loras",), "diffusion_models": ("unet", "diffusion_models"),
                 "vae": ("vae",), "text_encoders": ("text_encoders", "clip")}
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
MODEL_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
STUB_MODULES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.sd", "server")


class InterruptProcessingException(Exception):
    """ComfyUI's ``comfy.model_management.InterruptProcessingException``."""


@dataclass
class ProgressRecord:
    """One ``ProgressBar``: its updates as ``(value, total, preview)`` tuples."""

    total: int
    node_id: Any
    updates: list[tuple[int, int, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Patched:
    """What the stub ``comfy.sd.load_lora_for_models`` returns for the base MODEL or CLIP it was given."""

    base: Any
    lora: str  # the LoRA file's path
    strength: float


@dataclass(frozen=True)
class LoadedDiffusionModel:
    """What the stub ``comfy.sd.load_diffusion_model`` returns."""

    path: str


class StubBaseModel:
    """The ``BaseModel`` inside a ModelPatcher: ComfyUI-named weights under ``diffusion_model.``, and the detected
    ``model_config.unet_config``. The stub's config carries the diffusers -> ComfyUI name table that ComfyUI's
    ``comfy.utils.unet_to_diffusers`` would compute from the real config."""

    def __init__(self, weights: dict, diffusers_names: dict):
        import types as _types

        self.weights = {f"diffusion_model.{k}": v for k, v in weights.items()}
        self.model_config = _types.SimpleNamespace(unet_config={"stub_diffusers_names": dict(diffusers_names)})

    def state_dict(self) -> dict:
        return dict(self.weights)


class StubModelPatcher:
    """``comfy.model_patcher.ModelPatcher`` as far as weight patches go: ``clone`` shares the model, ``add_patches``
    keeps ComfyUI's tuple layout ``(strength_patch, value, strength_model, offset, function)``, and
    :meth:`patched_weights` applies them the way ``comfy.lora.calculate_weight`` does for the ``diff`` kind."""

    def __init__(self, model: StubBaseModel):
        self.model, self.patches = model, {}

    def clone(self) -> "StubModelPatcher":
        other = StubModelPatcher(self.model)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        return other

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        added = []
        own = self.model.state_dict()
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in own:
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
                added.append(k)
        return added

    def patched_weights(self) -> dict:
        out = {}
        for key, weight in self.model.state_dict().items():
            weight = weight.float().clone()
            for strength, value, strength_model, _offset, function in self.patches.get(key, []):
                if strength_model != 1.0:
                    weight *= strength_model
                assert len(value) == 1, "only the one-tensor diff kind is modelled"
                weight += (function or (lambda a: a))(strength * value[0].to(weight.dtype))
            out[key] = weight
        return out


class LoadedFile(dict):
    """The tensors of a file read by the stub ``comfy.utils.load_torch_file``, remembering where they came from."""

    def __init__(self, tensors: dict, path: str):
        super().__init__(tensors)
        self.path = path


@dataclass
class ComfyStub:
    """The stub runtime: its folders, what the pack called, and the knobs tests turn."""

    base: Path
    progress: list[ProgressRecord] = field(default_factory=list)
    lora_calls: list[tuple[Any, Any, str, float, float]] = field(default_factory=list)
    diffusion_calls: list[str] = field(default_factory=list)
    loaded_files: list[str] = field(default_factory=list)
    memory_calls: list[str] = field(default_factory=list)
    interrupt: bool = False
    interrupt_after: int | None = None  # processing_interrupted() turns True at this call (1-based)
    interrupt_polls: int = 0
    cancel_at_progress: int | None = None  # the user presses Cancel while the bar is at this value (a step number)
    client_id: str | None = "stub-client"  # the browser tab that queued the prompt (None: an API call without one)
    sent: list[tuple[str, dict, Any]] = field(default_factory=list)  # PromptServer.send_sync(event, data, sid)
    modules: dict[str, types.ModuleType] = field(default_factory=dict)

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    def model_dir(self, kind: str) -> Path:
        return self.models_dir / kind

    @property
    def tokenizer_dir(self) -> Path:
        """Where ComfyUI keeps its CLIP tokenizer (``comfy/sd1_tokenizer``) in this stub tree."""
        return self.base / "comfy" / "sd1_tokenizer"

    def last_progress(self) -> ProgressRecord:
        assert self.progress, "no ComfyUI ProgressBar was created"
        return self.progress[-1]

    def reset_interrupt(self, after: int | None = None, at_progress: int | None = None) -> None:
        """Clear the Cancel flag. ``after``: the flag turns on at that call of ``processing_interrupted()``;
        ``at_progress``: it turns on when the progress bar reaches that value, so the progress hook raises there,
        as ComfyUI's does."""
        self.interrupt, self.interrupt_after, self.interrupt_polls = False, after, 0
        self.cancel_at_progress = at_progress

    def _progress_hook(self, value: int) -> None:
        """ComfyUI's main.py hook: every ProgressBar update first calls throw_exception_if_processing_interrupted."""
        if self.cancel_at_progress is not None and value >= self.cancel_at_progress:
            self.interrupt, self.cancel_at_progress = True, None
        self._throw_if_interrupted()

    # --- the stub modules ---------------------------------------------------------------------------------------
    def _processing_interrupted(self) -> bool:
        self.interrupt_polls += 1
        if self.interrupt_after is not None and self.interrupt_polls >= self.interrupt_after:
            self.interrupt, self.interrupt_after = True, None
        return self.interrupt

    def _throw_if_interrupted(self) -> None:
        if self.interrupt:
            self.interrupt = False  # ComfyUI clears the flag as it raises
            raise InterruptProcessingException()

    def build_modules(self) -> dict[str, types.ModuleType]:
        stub = self
        folders = {kind: [str(self.model_dir(sub)) for sub in subs] for kind, subs in MODEL_FOLDERS.items()}
        for folder in (self.input_dir, self.output_dir, *(Path(f) for fs in folders.values() for f in fs)):
            folder.mkdir(parents=True, exist_ok=True)

        fp = types.ModuleType("folder_paths")
        fp.base_path = str(self.base)
        fp.models_dir = str(self.models_dir)
        fp.supported_pt_extensions = set(MODEL_EXTENSIONS)
        fp.folder_names_and_paths = {kind: (paths, set(MODEL_EXTENSIONS)) for kind, paths in folders.items()}
        fp.map_legacy = lambda kind: LEGACY_NAMES.get(kind, kind)
        fp.get_folder_paths = lambda kind: list(fp.folder_names_and_paths[fp.map_legacy(kind)][0])
        fp.get_filename_list = lambda kind: _filename_list(*fp.folder_names_and_paths[fp.map_legacy(kind)])
        fp.get_full_path = lambda kind, name: _full_path(
            fp.folder_names_and_paths.get(fp.map_legacy(kind), ([], set()))[0], name)
        fp.get_input_directory = lambda: str(stub.input_dir)
        fp.get_output_directory = lambda: str(stub.output_dir)
        fp.get_user_directory = lambda: str(stub.base / "user")

        comfy = types.ModuleType("comfy")
        # Like the real one, comfy/ is a namespace package: a __path__, no __file__ (modules resolve via sys.modules)
        comfy.__path__ = [str(self.base / "comfy")]

        utils = types.ModuleType("comfy.utils")
        utils.PROGRESS_BAR_HOOK = None
        utils.ProgressBar = _progress_bar_class(self)
        utils.load_torch_file = self._load_torch_file
        utils.unet_to_diffusers = lambda unet_config: dict(unet_config["stub_diffusers_names"])

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = InterruptProcessingException
        mm.processing_interrupted = self._processing_interrupted
        mm.throw_exception_if_processing_interrupted = self._throw_if_interrupted
        mm.interrupt_current_processing = lambda value=True: setattr(stub, "interrupt", bool(value))
        mm.unload_all_models = lambda: stub.memory_calls.append("unload_all_models")
        mm.soft_empty_cache = lambda force=False: stub.memory_calls.append("soft_empty_cache")

        sd = types.ModuleType("comfy.sd")
        sd.load_lora_for_models = self._load_lora_for_models
        sd.load_diffusion_model = self._load_diffusion_model

        server = types.ModuleType("server")
        server.PromptServer = type("PromptServer", (), {"instance": _PromptServer(self)})

        comfy.utils, comfy.model_management, comfy.sd = utils, mm, sd
        self.modules = {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
                        "comfy.sd": sd, "server": server}
        return self.modules

    def _load_torch_file(self, path: str, safe_load: bool = False, device=None, return_metadata: bool = False):
        from safetensors.torch import load_file

        self.loaded_files.append(str(path))
        tensors = LoadedFile(load_file(str(path)), str(path))
        return (tensors, {}) if return_metadata else tensors

    def _load_lora_for_models(self, model, clip, lora, strength_model: float, strength_clip: float):
        path = getattr(lora, "path", "<tensors>")
        self.lora_calls.append((model, clip, path, strength_model, strength_clip))
        return Patched(model, path, strength_model), Patched(clip, path, strength_clip)

    def _load_diffusion_model(self, unet_path: str, model_options: dict | None = None):
        self.diffusion_calls.append(str(unet_path))
        return LoadedDiffusionModel(str(unet_path))


def _progress_bar_class(stub: ComfyStub) -> type:
    class ProgressBar:
        """ComfyUI's ``comfy.utils.ProgressBar`` (same clamping), recording every update."""

        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id
            self.record = ProgressRecord(total, node_id)
            stub.progress.append(self.record)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            stub._progress_hook(self.current)  # raises like ComfyUI's hook when Cancel was pressed
            self.record.updates.append((self.current, self.total, preview))

        def update(self, value):
            self.update_absolute(self.current + value)

    return ProgressBar


class _PromptServer:
    """``server.PromptServer.instance``: the fields the pack reads, and ``send_sync`` recording each message."""

    def __init__(self, stub: ComfyStub):
        self.stub = stub
        self.last_prompt_id = "stub-prompt"

    @property
    def client_id(self):
        return self.stub.client_id

    def send_sync(self, event, data, sid=None):
        self.stub.sent.append((event, data, sid))


def _filename_list(folders: list[str], extensions: set[str]) -> list[str]:
    """Files under ``folders`` (recursively, '/'-separated relative names) with a model extension, like ComfyUI."""
    names = set()
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if Path(name).suffix.lower() in extensions:
                    names.add(Path(os.path.relpath(os.path.join(dirpath, name), folder)).as_posix())
    return sorted(names)


def _full_path(folders: list[str], name: str) -> str | None:
    for folder in folders:
        candidate = os.path.join(folder, os.path.normpath(name))
        if os.path.isfile(candidate):
            return candidate
    return None


# --- installing and loading ------------------------------------------------------------------------------------
def install(base: Path) -> tuple[ComfyStub, Callable[[], None]]:
    """Put the stub modules into ``sys.modules``; returns the stub and a function that restores what was there."""
    stub = ComfyStub(Path(base))
    saved = {name: sys.modules.get(name) for name in STUB_MODULES}
    sys.modules.update(stub.build_modules())

    def restore() -> None:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

    return stub, restore


def load_pack(name: str = PACK_NAME) -> types.ModuleType:
    """Import the repository root as a custom-node package named ``name`` (once per process), as ComfyUI does."""
    if name in sys.modules:
        return sys.modules[name]
    import trainer

    init = ROOT / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The nodes reach the library as "<pack>.trainer" (relative imports); the tests import it as top-level
    # "trainer". Two copies would hold two of every class, and the nodes' isinstance checks (nodes/_sockets.py)
    # would refuse the tests' configs. So the pack's "trainer" IS the tests' one: the nodes import only names of
    # trainer/__init__.py (tests/test_imports.py checks it), never a "<pack>.trainer.<module>", so aliasing the
    # package is enough; everything the package imports stays under "trainer.*".
    sys.modules[f"{name}.trainer"] = trainer
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        sys.modules.pop(f"{name}.trainer", None)
        raise
    return module


def node_info(node_id: str, cls: type, display_name: str) -> dict[str, Any]:
    """The ``/object_info`` entry ComfyUI's server builds for a V1 node class (the fields tests compare)."""
    inputs = cls.INPUT_TYPES()
    outputs = list(cls.RETURN_TYPES)
    return {
        "name": node_id,
        "display_name": display_name,
        "category": cls.CATEGORY,
        "input": {section: dict(specs) for section, specs in inputs.items()},
        "input_order": {section: list(specs) for section, specs in inputs.items()},
        "output": outputs,
        "output_name": list(getattr(cls, "RETURN_NAMES", outputs)),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs))),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
        "python_module": f"custom_nodes.{PACK_NAME}",
    }


def pack_object_info(pack: types.ModuleType) -> dict[str, dict[str, Any]]:
    """``/object_info`` entries for every node of the loaded pack."""
    names = pack.NODE_DISPLAY_NAME_MAPPINGS
    return {node_id: node_info(node_id, cls, names.get(node_id, node_id))
            for node_id, cls in pack.NODE_CLASS_MAPPINGS.items()}


def in_models(folder) -> "Path":
    """A copy of a model folder inside the stub ComfyUI's models folder: node inputs may only name model paths
    inside ComfyUI's folders (or allowed roots), as on a real server."""
    import shutil

    import folder_paths

    dest = Path(folder_paths.models_dir) / "diffusers" / Path(folder).name
    if not dest.exists():
        shutil.copytree(folder, dest)
    return dest


# --- calling nodes as ComfyUI does -------------------------------------------------------------------------------------
def node_defaults(cls) -> dict:
    """Every widget's default, as a new node in the UI has them."""
    values = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if "default" in options and (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")):
                values[name] = options["default"]
    return values


def run_node(nodes, node_id: str, **inputs):
    """Run a node with its defaults plus ``inputs``; its result tuple (the ``ui`` part dropped)."""
    cls = nodes[node_id]
    out = getattr(cls(), cls.FUNCTION)(**{**node_defaults(cls), **inputs})
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def demo_images_in_input(input_dir: Path, demo_dataset: Path, count: int, name: str = "small") -> str:
    """The first ``count`` demo images (with captions) copied to ``input/<name>/<concept>/``; returns ``name``."""
    import shutil

    concept = next(p for p in sorted(demo_dataset.iterdir()) if p.is_dir())
    target = input_dir / name / concept.name
    target.mkdir(parents=True)
    for image in sorted(concept.glob("*.png"))[:count]:
        shutil.copy(image, target)
        shutil.copy(image.with_suffix(".txt"), target)
    return name

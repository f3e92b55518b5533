"""What every lesson needs first: where it runs, which model, and where its files go.

    from socratic_lora.lesson import setup
    env = setup(use_gpu_model=False)   # the one switch of every lesson
    env.model        # offline default folder, or "google/gemma-2-2b-jpn-it"
    env.config       # training config for this setting: demo | colab_t4 | kaggle_2xt4_balanced
    env.adapter()    # the tuned adapter of this setting (trained once, then reused)

`use_gpu_model=False` (the book is built this way) runs everything on the CPU with the offline
default Gemma 3 270M base; `True` runs the same code with gemma-2-2b-jpn-it in 4-bit on
Colab's T4 or Kaggle's two T4s. Nothing else in a lesson changes between the two.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

GPU_MODEL = "google/gemma-2-2b-jpn-it"


def detect_platform() -> str:
    """"colab", "kaggle" or "local"."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    return "local"


def _short_warnings(message, category, filename, lineno, line=None) -> str:
    # Warnings keep their text but not the file path: a built page must not show where a
    # library was installed on the machine that built it.
    return f"{category.__name__}: {message}\n"


@dataclass
class LessonEnv:
    platform: str          # colab | kaggle | local
    use_gpu_model: bool    # the switch
    model: str             # what load_model / TrainSettings.model get
    model_name: str        # for "this page's outputs were produced by ..."
    config: str            # shipped training config for this setting
    gpus: int              # CUDA devices visible
    work: Path             # runs/ folder for this lesson's files (relative, so pages show no local path)

    def settings(self, **overrides):
        """The training settings of this setting (`load_settings(self.config)`), output in work/."""
        from .train import load_settings
        overrides.setdefault("output_dir", str(self.work / self.config))
        return load_settings(self.config, **overrides)

    @property
    def quant(self):
        """How lessons load the base to chat and evaluate: 4-bit NF4 on the GPU (as trained,
        and as the page says), None (16-bit) for the offline default on the CPU."""
        from .quant import QuantSettings
        return QuantSettings(bits=4) if self.use_gpu_model else None

    def adapter(self) -> Path:
        """The tuned adapter for this setting: trained by lesson 06 and reused by later lessons.
        When a lesson runs alone (Colab, Kaggle) and it is missing, it is trained here."""
        from .train import complete_checkpoints, train
        s = self.settings()
        path = Path(s.output_dir) / "adapter"
        if not (path / "adapter_model.safetensors").exists():
            print(f"{path} がないので、ここで学習します ({self.config} 設定)…")
            # Continue from a complete checkpoint (a Colab session cut off mid-run); otherwise
            # start over: the folder only ever holds this setting's own run.
            resume = bool(complete_checkpoints(s.output_dir))
            train(s, resume=resume, overwrite=not resume)
        return path

    def __str__(self) -> str:
        where = {"colab": "Google Colab", "kaggle": "Kaggle", "local": "ローカル"}[self.platform]
        device = f"GPU {self.gpus} 枚" if self.gpus else "CPU"
        return (f"実行環境: {where} / {device}\n"
                f"このページの出力を作ったモデル: {self.model_name}\n"
                f"学習設定: {self.config}   作業フォルダ: {self.work}")


def setup(use_gpu_model: bool = False, work: str | os.PathLike = "runs", quiet: bool = True) -> LessonEnv:
    """Detect the platform, pick the model for the switch, and tidy the output.

    `quiet` lowers transformers' logging to errors and prints warnings without file paths.
    During the book build ($SOCRATIC_LORA_BOOK=1) progress bars are off as well.
    """
    if quiet:
        # Before the first transformers import: tqdm warns about missing notebook widgets then.
        warnings.formatwarning = _short_warnings
        warnings.filterwarnings("ignore", message="IProgress not found")
        # peft calls an attribute transformers 5.x deprecated; nothing a learner can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels
    import torch

    if quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    if os.environ.get("SOCRATIC_LORA_BOOK"):
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        import datasets
        datasets.disable_progress_bars()
    platform = detect_platform()
    gpus = torch.cuda.device_count()
    if use_gpu_model:
        if gpus == 0:
            raise RuntimeError(
                "use_gpu_model=True needs a CUDA GPU, and none is visible. Colab: Runtime > "
                "Change runtime type > T4 GPU. Kaggle: Settings > Accelerator > GPU T4 x2. "
                "Or set use_gpu_model=False to use the offline default on the CPU. / "
                "GPU が見つかりません。ランタイムで GPU を選ぶか、use_gpu_model=False にしてください。")
        config = "kaggle_2xt4_balanced" if gpus >= 2 else "colab_t4"
        name = f"{GPU_MODEL} (4-bit NF4, GPU)"
        model = GPU_MODEL
    else:
        from .models import default_model_path
        config = "demo"
        name = "Gemma 3 270M base (オフライン既定モデル, CPU)"
        model = str(default_model_path())
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    return LessonEnv(platform=platform, use_gpu_model=use_gpu_model, model=model,
                     model_name=name, config=config, gpus=gpus, work=work)


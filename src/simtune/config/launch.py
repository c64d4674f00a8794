"""How the job is launched: processes, nodes, DeepSpeed/FSDP, model sharding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass
class LaunchArgs:
    """How the job is launched: processes, nodes, DeepSpeed/FSDP, model sharding."""

    cli_group: ClassVar[str] = "several processes options"
    doc_section: ClassVar[str] = "several processes (data-parallel)"

    nproc: int | None = None
    """Training processes on this node, data-parallel through torchrun (default: one
    per --devices entry, else 1). The global batch is per_device_train_batch_size x
    processes x gradient_accumulation_steps. Without a GPU the processes use the gloo
    backend on CPU. Only rank 0 logs to MLflow, writes the model and registers it."""

    nnodes: int = 1
    """Nodes taking part (torchrun --nnodes): run the same command on every node, each
    with its own --node_rank and the same --master_addr/--master_port and workspace."""

    node_rank: int = 0
    """This node's rank among --nnodes (torchrun --node_rank); 0 is the master."""

    master_addr: str = "127.0.0.1"
    """Address of the node with --node_rank 0 (torchrun --master_addr)."""

    master_port: int = 0
    """Rendezvous port on the master node (torchrun --master_port; 0: a free port on a
    single node, 29500 with several nodes)."""

    accelerate_config: str | None = None
    """Launch with `accelerate launch --config_file FILE` instead of torchrun, so the
    file's settings (DeepSpeed, FSDP, mixed precision, num_processes) apply to
    SFT, reward-model training and PPO alike."""

    device_map: str | None = None
    """'auto': load the base model sharded layer by layer over all visible GPUs (and CPU
    memory past them) through accelerate, in one process -- for SFT of a model larger
    than one GPU (YuLan-OneSim loads its 14B models so). Use
    it when the model does not fit one GPU and speed matters less than simplicity (the
    GPUs take turns); use --nproc or --devices (data parallel) when it fits one GPU, and FSDP
    or DeepSpeed ZeRO-3 through --accelerate_config / --deepspeed when it does not and
    every GPU should compute at once."""

    deepspeed: str | None = None
    """DeepSpeed JSON config for SFT and reward-model training (the Hugging Face
    Trainer's --deepspeed; needs the deepspeed package). For PPO put DeepSpeed in an
    --accelerate_config instead."""

    def problems(self) -> list[str]:
        """Every problem of these options alone (`TuningConfig` checks how they combine
        with --devices and --tuning_mode)."""
        out = []
        if self.nproc is not None and self.nproc < 1:
            out.append(f"--nproc: must be >= 1, got {self.nproc!r}")
        if self.nnodes < 1:
            out.append(f"--nnodes: must be >= 1, got {self.nnodes!r}")
        elif not 0 <= self.node_rank < self.nnodes:
            out.append(
                f"--node_rank: must be in [0, --nnodes), got {self.node_rank!r} "
                f"with --nnodes {self.nnodes}"
            )
        if not 0 <= self.master_port <= 65535:
            out.append(f"--master_port: must be a port number, got {self.master_port!r}")
        if not str(self.master_addr).strip():
            out.append("--master_addr: must not be empty")
        for name in ("accelerate_config", "deepspeed"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_file():
                out.append(f"--{name}: {value} is not a file")
        if self.device_map is not None and self.device_map != "auto":
            out.append(f"--device_map: only 'auto' is supported, got {self.device_map!r}")
        return out

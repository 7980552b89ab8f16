"""The trl worker (`python -m llm_assets.posttrain`) with rank 1 crashing at its third step: what a
failure in one torchrun rank looks like to the step that launched it (test_processes.py)."""

import os
import runpy

MESSAGE = "rank 1 lost its device"


def crash_rank_1_at_the_third_step() -> None:
    from transformers import Trainer

    train_one_step = Trainer.training_step

    def crashing(self: Trainer, *args: object, **kwargs: object) -> object:
        if self.state.global_step == 2:
            raise RuntimeError(MESSAGE)
        return train_one_step(self, *args, **kwargs)

    Trainer.training_step = crashing


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        crash_rank_1_at_the_third_step()
    runpy.run_module("llm_assets.posttrain", run_name="__main__", alter_sys=True)

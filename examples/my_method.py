"""An example plugin: KD on uniformly random inputs, in one file.

Run it with:  bench run --grid examples/my_grid.yaml --plugin examples/my_method.py
It appears in runs.csv as the method ``uniform_kd``, beside the built-in ones.
"""
from dataclasses import dataclass

import torch

from bench.method import DataAccess, Method, MethodConfig, TeacherAccess, register
from methods.losses import kd_loss


@register("uniform_kd")
class UniformKD(Method):
    """KD on U(-1, 1) images in the normalised input space (a toy data-free method)."""

    data_access = DataAccess.NONE  # the context holds no real data for this method
    teacher_access = TeacherAccess.OUTPUTS

    @dataclass
    class Config(MethodConfig):
        iterations: int = 2000  # the "paper" budget; the grid's budget scales it
        batch_size: int = 128
        lr: float = 1e-3
        temperature: float = 4.0

    def distill(self, teacher, student, ctx):
        cfg = self.config
        # the paper's length scaled by the grid's budget, cut to a teacher-query or step cap if the grid sets one
        steps = ctx.plan_steps(ctx.scaled(cfg.iterations), queries_per_step=cfg.batch_size)
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        ctx.track(optimizer=optimizer)  # saved in in-cell checkpoints with the student
        student.train()
        for step in ctx.steps(steps, "uniform_kd"):  # progress bar, caps, anytime curve, checkpoints
            x = torch.rand((cfg.batch_size, *ctx.input_shape), device=ctx.device) * 2 - 1
            with torch.no_grad():
                t_logits = teacher.log_probs(x)  # counted in teacher_queries; works for a probs or logits API
            loss = kd_loss(student(x), t_logits, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ctx.log(step, loss=loss)  # kept every 50th step (the others cost nothing); NaN fails the cell
        return student

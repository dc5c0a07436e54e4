"""Flow-matching ODE sampler of the Token2Wav DiT (HF 4.57.6 ``Qwen2_5OmniToken2WavDiTModel.sample``).

The mel is the solution at t = 1 of dx/dt = v(t, x) from Gaussian noise at t = 0:

* time points: ``num_steps`` points of linspace(0, 1) moved by the sway schedule
  t += s * (cos(pi/2 * t) - 1 + t); with s = -1 this is t = 1 - cos(pi/2 * t) (dense near t = 0);
* integration: Runge-Kutta 4 with Kutta's 3/8 rule on each interval (HF ``RungeKutta4ODESolver``, the
  torchdiffeq "rk4" step), 4 velocity evaluations per interval: 9 intervals x 4 = 36 at 10 points;
* classifier-free guidance: v = v_c + s_g * (v_c - v_u), both branches evaluated in one batch of 2 (the
  caller's ``velocity`` does that); below a scale of 1e-5 HF evaluates the conditional branch alone.

Time arithmetic is done on 0-d fp32 tensors in HF's order so that the DiT sees bit-identical time steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# HF skips the unconditional branch below this guidance scale.
GUIDANCE_EPS = 1e-5


def sway_time_points(num_steps: int, sway_coefficient: float | None, device=None) -> torch.Tensor:
    """The ``num_steps`` time points in [0, 1] (fp32): linspace plus the sway shift (None: no sway)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (two time points make one interval), got {num_steps}")
    t = torch.linspace(0, 1, num_steps, device=device, dtype=torch.float32)
    if sway_coefficient is not None:
        t = t + sway_coefficient * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def rk4_38_step(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: torch.Tensor,
    t1: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """One step of RK4 with the 3/8 rule from (t0, x) to t1; returns x(t1). 4 calls of ``velocity(t, x)``."""
    dt = t1 - t0
    third = 1.0 / 3.0
    k1 = velocity(t0, x)
    k2 = velocity(t0 + dt * third, x + dt * k1 * third)
    k3 = velocity(t0 + dt * (2.0 / 3.0), x + dt * (k2 - k1 * third))
    k4 = velocity(t1, x + dt * (k1 - k2 + k3))
    return x + (k1 + 3 * (k2 + k3) + k4) * dt / 8


def integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    time_points: torch.Tensor,
) -> torch.Tensor:
    """x(time_points[-1]) from x(time_points[0]) = x0, one RK4 3/8 step per interval."""
    x = x0
    for i in range(len(time_points) - 1):
        x = rk4_38_step(velocity, time_points[i], time_points[i + 1], x)
    return x


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, HF's expression order: v_c + (v_c - v_u) * scale."""
    return v_cond + (v_cond - v_uncond) * scale

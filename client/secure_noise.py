"""Where a site's private mechanisms get their randomness: Poisson membership and Gaussian noise.

One :class:`NoiseSource` feeds every random draw of a private round: which
records a Poisson batch holds (DP-SGD, the importance estimate's batches) and
the Gaussian noise added to clipped sums (DP-SGD, the importance estimate,
the class-sum release). Two kinds:

- :meth:`NoiseSource.secure` (deployments): every uniform comes from the
  operating system's CSPRNG (``os.urandom``), so nobody can regenerate the
  draws from a seed or from a generator state.
- :meth:`NoiseSource.seeded` (tests and benchmarks only): the same transforms
  fed by a seeded ``torch.Generator``, so a run reproduces exactly.

Both go through the same code from uniforms onwards, so a test run on the
seeded source checks the transforms that a deployment runs.

What this follows, and why it is not hand-rolled cryptography: the random
bytes come from the OS CSPRNG unchanged (8 bytes give one 53-bit uniform,
the way ``random.SystemRandom.random`` and numpy build doubles from 64 bits);
nothing here generates or stretches randomness. Gaussians come from the
textbook Box-Muller transform of two uniforms. Against floating-point attacks
on a single Gaussian sample (its low-order bits reveal the uniforms behind
it, Jin et al. 2021, arXiv:2107.10138, and the attack on Opacus in
arXiv:2112.05307), each released coordinate is, exactly as Opacus'
``secure_mode`` does in ``opacus.optimizers.optimizer._generate_noise``, the
sum of ``2n = 4`` independent draws of std ``s`` divided by ``2`` (std ``s``
again; section 5.1 of 2107.10138, n = 2: attack complexity ``2^(53(2n-1))``).
Opacus also draws and throws away one sample first; that protects a seeded
generator's first output, and OS CSPRNG bytes are independent draw to draw,
so it is not repeated here.

Why not torchcsprng (what Opacus' secure_mode asks for): its last release
targets torch 1.x and the package index here has no build of it; the
operating system's CSPRNG through the standard library is what remains.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

SECURE_TERMS = 4  # Opacus secure_mode: the sum of 2n = 4 draws, n = 2 ...
SECURE_SCALE = 0.5  # ... divided by sqrt(4) = 2, so the std is the one asked for
_MANTISSA = 53  # bits of a float64 significand: one uniform per 8 OS bytes, top 53 bits kept


class NoiseSource:
    """The randomness of one site's private mechanisms: Poisson membership and Gaussian noise.

    Build it with :meth:`secure` (deployments) or :meth:`seeded` (tests,
    benchmarks). Every draw of both kinds goes through :meth:`uniform`, so the
    source of bits is the only difference between them.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        """Use :meth:`secure` or :meth:`seeded`; ``generator = None`` means the OS CSPRNG."""
        self._generator = generator

    @classmethod
    def secure(cls) -> NoiseSource:
        """Every draw from the operating system's CSPRNG (``os.urandom``): the source a deployment uses."""
        return cls(None)

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """A deterministic source from a ``torch.Generator`` seeded with ``seed``: for tests and benchmarks only.

        Never in a deployment: anyone who knows (or guesses) the seed can
        regenerate the noise and subtract it, and a seed reused across rounds
        repeats the same noise.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed {seed!r}: use a whole number >= 0 (or NoiseSource.secure() for a deployment)")
        return cls(torch.Generator().manual_seed(seed))

    @property
    def is_secure(self) -> bool:
        """True when the draws come from the OS CSPRNG."""
        return self._generator is None

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` independent uniforms in ``[0, 1)`` as a CPU float64 tensor (multiples of 2^-53)."""
        if count < 0:
            raise ValueError(f"count {count!r}: use a whole number >= 0")
        if self._generator is not None:
            return torch.rand(count, dtype=torch.float64, generator=self._generator)
        words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        return torch.from_numpy((words >> np.uint64(64 - _MANTISSA)).astype(np.float64) * 2.0**-_MANTISSA)

    def poisson(self, records: int, sample_rate: float) -> torch.Tensor:
        """One Poisson batch: the indices (long, ascending) of the records each drawn with probability ``sample_rate``.

        The same distribution as Opacus' ``UniformWithReplacementSampler``
        (``rand(records) < sample_rate``); ``records = 0`` gives an empty batch.
        """
        if isinstance(records, bool) or not isinstance(records, int) or records < 0:
            raise ValueError(f"records {records!r}: use a whole number >= 0")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate {sample_rate!r}: use a probability in [0, 1]")
        return torch.nonzero(self.uniform(records) < sample_rate).flatten()

    def standard_normal(self, count: int) -> torch.Tensor:
        """``count`` independent standard Gaussians (CPU float64) by Box-Muller, both outputs of each pair used."""
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # 1 - u is in (0, 1]: log never sees 0
        angle = (2.0 * math.pi) * u[pairs:]
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]

    def gaussian(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Gaussian noise of mean 0 and std ``std``, hardened as Opacus' secure_mode (sum of 4 draws, halved).

        Drawn in float64 on the CPU (where the OS CSPRNG or the seeded
        generator lives), then cast to ``dtype`` and moved to ``device`` in
        one copy: the draws, their distribution and a seeded source's
        numbers are the same whatever the device (a GPU parameter gets the
        very values a CPU one would). ``std = 0`` gives zeros without drawing.
        """
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std {std!r}: use a finite value >= 0")
        shape = tuple(int(s) for s in shape)
        count = math.prod(shape)
        if std == 0 or count == 0:
            return torch.zeros(shape, device=device, dtype=dtype)
        total = self.standard_normal(count)
        for _ in range(SECURE_TERMS - 1):
            total += self.standard_normal(count)
        return (total * (SECURE_SCALE * std)).reshape(shape).to(device=device, dtype=dtype)

    def gaussian_numpy(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """:meth:`gaussian` as a float64 numpy array (for releases computed in numpy)."""
        return self.gaussian(shape, std, dtype=torch.float64).numpy()

"""The spec's f64 constants (docs/exact-spec.md, sections 7 and 14), in one
place: the torch implementations and the native kernels' C source (written
from these with ``float.hex``) use the same values."""

from __future__ import annotations

import math

__all__ = ["LOG2E", "LN2_HI", "LN2_LO", "SQRT_HALF", "EXP_C", "LOG_C", "ERFC_C",
           "INV_SQRT_2PI", "SQRT_2_PI", "TANH_SMALL", "TANH_C"]

# Section 7. EXP_C[n] = 1/n!, LOG_C[n] = 1/(2n+1): Python's float / int
# division is correctly rounded (n! < 2^53 is exact as a float).
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238  # 0x3FE62E42FEE00000
LN2_LO = 1.9082149292705877e-10  # 0x3DEA39EF35793C76
SQRT_HALF = 0.7071067811865476  # 0x3FE6A09E667F3BCD, sqrt(1/2) correctly rounded
EXP_C = [1.0 / math.factorial(n) for n in range(12)]
LOG_C = [1.0 / (2 * n + 1) for n in range(12)]

# Section 14, GELU: Numerical Recipes' erfcc coefficients C0..C9 (f64 literals).
ERFC_C = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
          -1.13520398, 1.48851587, -0.82215223, 0.17087277)
INV_SQRT_2PI = 0.3989422804014327  # 0x3FD9884533D43651
SQRT_2_PI = 0.7978845608028654  # sqrt(2/pi), the tanh form

# Section 20, tanh: below TANH_SMALL the odd Taylor series (no cancellation of
# 1 - exp(-2a)); TANH_C[n] is the coefficient of d^(2n+1), 2^(2n+2) (2^(2n+2)
# - 1) B_(2n+2) / (2n+2)!, the correctly rounded quotient of two integers
# (Python's int / int is correctly rounded).
TANH_SMALL = 0.0625
TANH_C = (1 / 1, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
          -929569 / 638512875)

# ATen's GRAIN_SIZE: elements below which an elementwise call runs on one thread
# (the native kernels split work the same way; fpenv gives every thread a chunk).
GRAIN = 32768

# Section 28, sin and cos: Cody-Waite's split of pi/2 (fdlibm's e_rem_pio2.c):
# PIO2_1 and PIO2_2 hold 33 bits each, so k * PIO2_1 and k * PIO2_2 are exact
# for |k| < 2^20; PIO2_2T is the rest of pi/2 (an f64). INV_PIO2 = 2/pi.
INV_PIO2 = 0.6366197723675814  # 0x3FE45F306DC9C883
PIO2_1 = 1.5707963267341256  # 0x3FF921FB54400000
PIO2_2 = 6.077100506303966e-11  # 0x3DD0B4611A600000
PIO2_2T = 2.0222662487959506e-21  # 0x3BA3198A2E037073
TRIG_MAX = 1048576.0  # 2^20: |x| beyond is outside section 28
# Taylor coefficients (-1)^n / (2n)! (n = 0..9) and (-1)^n / (2n+1)! (n = 0..8),
# each 1.0 / k! correctly rounded, then negated (exact): section 9.1's cospi's.
COS_C = tuple((-1.0 if n % 2 else 1.0) * (1.0 / math.factorial(2 * n)) for n in range(10))
SIN_C = tuple((-1.0 if n % 2 else 1.0) * (1.0 / math.factorial(2 * n + 1)) for n in range(9))

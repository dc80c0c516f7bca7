"""nemo-paced: PACED distillation (arXiv 2603.11178) for the NeMo / Megatron stack.

Problems are weighted by the student's pass rate p with the Beta kernel w(p) = p^a (1-p)^b,
so training concentrates on the frontier of the student's competence.
"""

__version__ = "0.1.0"

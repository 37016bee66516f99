"""Attacks composed from core.py's parts: PGD (+ restarts), APGD-CE/-T, FAB-T, Square and
AutoAttack. Every attack is a frozen dataclass called as attack(model_fn, x, y, seed)."""

from keras_arat.attacks import core
from keras_arat.attacks.apgd import APGD
from keras_arat.attacks.autoattack import (AutoAttack, AutoAttackResult, BudgetError,
                                           EvaluationError, InputRangeError,
                                           NonFiniteOutputError, ProbabilityOutputError,
                                           Restarts, check_adversarial, check_agreement,
                                           check_inputs, check_logits, run_attack,
                                           standard_attacks)
from keras_arat.attacks.fab import FABTargeted
from keras_arat.attacks.pgd import PGD
from keras_arat.attacks.square import Square

__all__ = ["APGD", "AutoAttack", "AutoAttackResult", "BudgetError", "EvaluationError",
           "FABTargeted", "InputRangeError", "NonFiniteOutputError", "PGD",
           "ProbabilityOutputError", "Restarts", "Square", "check_adversarial",
           "check_agreement", "check_inputs", "check_logits", "core", "run_attack",
           "standard_attacks"]

"""robustbench.json: an evaluation in RobustBench's model_info format (no TensorFlow).

RobustBench keeps one JSON file per model under model_info/<dataset>/<Linf|L2>/, e.g.

    {"link": "https://arxiv.org/abs/2210.15318", "name": "Efficient and Effective ...",
     "authors": "...", "additional_data": false, "number_forward_passes": 1,
     "dataset": "cifar10", "venue": "NeurIPS 2022", "architecture": "ResNet-18",
     "eps": "8/255", "clean_acc": "85.71", "reported": "52.50", "autoattack_acc": "52.48",
     "unreliable": false}

Accuracies are percent strings (their code reads float(value) / 100), eps a string such
as "8/255" or "0.5", venue "" for unpublished work (their leaderboard shows
"Unpublished"). "reported" is the robust accuracy the authors report; for a model
evaluated here that is this evaluation's AutoAttack figure. The footnote says how and on
how many test images it was measured.
"""

# Keys of RobustBench's model_info files for the Linf and L2 threat models.
FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
          "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc",
          "unreliable", "footnote")

METHODS = {"arat": "ARAT", "pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART",
           "standard": "Standard training"}
ARCHITECTURES = {"resnet18": "ResNet-18", "preact_resnet18": "PreActResNet-18",
                 "wrn34_10": "WideResNet-34-10", "wrn10_1": "WideResNet-10-1"}


def architecture(config):
    """RobustBench's architecture text of a run's model (its RunConfig)."""
    model = config.model
    if model == "wrn":
        return f"WideResNet-{config.wrn_depth}-{config.wrn_width}"
    if model == "small_cnn":
        stem = "" if config.cnn_stem_stride == 1 else f"-stem{config.cnn_stem_stride}"
        return f"SmallCNN-{config.cnn_width}{stem}"
    return ARCHITECTURES.get(model, model)


def eps_text(eps):
    """8/255 for a multiple of 1/255, else the number ("0.5", "0.25")."""
    steps = eps * 255
    if round(steps) >= 1 and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:.6g}"


def percent(accuracy):
    """A fraction in [0, 1] as RobustBench writes it: "85.34"."""
    return f"{100.0 * float(accuracy):.2f}"


def model_info(clean_acc, autoattack_acc, eps, architecture, dataset, method, unreliable,
               footnote, name=None):
    """The model_info dict of one evaluation (accuracies as fractions in [0, 1])."""
    if name is None:
        name = (f"{METHODS[method]} ({architecture}), trained with keras_arat"
                if method in METHODS else f"{architecture}, evaluated with keras_arat")
    return {
        "link": "",
        "name": name,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture,
        "eps": eps_text(eps),
        "clean_acc": percent(clean_acc),
        "reported": percent(autoattack_acc),
        "autoattack_acc": percent(autoattack_acc),
        "unreliable": bool(unreliable),
        "footnote": footnote,
    }

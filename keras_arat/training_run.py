"""A training run from a RunConfig: its folder, the objects it trains, fit, the final
evaluation and SWA. keras_arat.train is the command line over train(cfg).

    from keras_arat import config, training_run
    results = training_run.train(cfg)   # a config.RunConfig; returns results.json's dict
"""

import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

from keras_arat import config, errors, files, results, runs


def prepare_workdir(cfg, write=True):
    """Write config.json, or check it matches an existing run. Returns True to resume.

    write=False (a non-chief worker) only checks: it changes nothing on disk.
    """
    path = os.path.join(cfg.workdir, "config.json")
    if not write:
        if cfg.overwrite or not os.path.exists(path):
            return False
    else:
        os.makedirs(cfg.workdir, exist_ok=True)
    ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
    has_checkpoints = os.path.isdir(ckpt_dir) and any(
        n.startswith("epoch-") for n in os.listdir(ckpt_dir))
    if os.path.exists(path) and not cfg.overwrite:
        # A setting added since the run began reads at its default (RunConfig.from_dict).
        old, new = config.read_config(cfg.workdir).to_dict(), cfg.to_dict()
        diff = sorted(k for k in new if k not in config.RESUMABLE_CHANGES and old[k] != new[k])
        if diff and has_checkpoints:
            raise errors.UsageError(
                f"{cfg.workdir} holds a run with a different configuration ({', '.join(diff)}"
                "): use another --workdir or pass --overwrite")
        if has_checkpoints and not cfg.resume:
            raise errors.UsageError(f"{cfg.workdir} already has checkpoints: pass --resume "
                                  "to continue or --overwrite to start afresh")
    if not write:
        return has_checkpoints and cfg.resume
    if cfg.overwrite:
        for name in ("checkpoints", "tensorboard", "metrics.jsonl", "results.json"):
            target = os.path.join(cfg.workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        has_checkpoints = False
    files.write_json(path, cfg.to_dict(), sort_keys=True)
    return has_checkpoints and cfg.resume


def trim_metrics(workdir, epoch):
    """Keep the metrics lines a resumed run starts from: training epochs and evaluations
    during training up to `epoch`; later ones and the final evaluation are redone."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # blank, or cut off by a crash or a full disk mid-write
                continue
            if (record.get("epoch", 0) <= epoch
                    and record.get("split", "train") in ("train", "test")):
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def split_holdout(cfg, data):
    """(training data, (x, y) float32 subset for evaluation during training or None).

    --eval_during_training_on=test takes the first N test images (what the reference
    code evaluates on); holdout takes the last N training images and trains without them.
    """
    if not cfg.eval_every_epochs:
        return data, None
    n = cfg.eval_examples_during_training
    if cfg.eval_during_training_on == "test":
        x, y = data.x_test[:n], data.y_test[:n]
        return data, (x.astype("float32") / 255.0, y)
    if n >= len(data.x_train):
        raise errors.UsageError(f"--eval_examples_during_training={n} leaves no training "
                              f"images of {len(data.x_train)} for a holdout")
    x, y = data.x_train[-n:], data.y_train[-n:]
    data = dataclasses.replace(data, x_train=data.x_train[:-n], y_train=data.y_train[:-n])
    return data, (x.astype("float32") / 255.0, y)


@dataclasses.dataclass
class Training:
    """A run ready to train (what build() returns; fit() and finish() take it)."""
    cfg: config.RunConfig  # for a non-chief worker, with its private workdir
    shared_workdir: str  # the run's --workdir (the chief's)
    data: object
    network: object
    trainer: object
    optimizer: object
    schedule: object
    manager: object
    swa_state: object
    steps_per_epoch: int
    initial_epoch: int
    callbacks: list
    stopper: object
    evaluator: object
    mixed_precision: bool

    def batches(self, epochs, initial_epoch):
        return training_batches(self.cfg, self.data, epochs, initial_epoch)


def training_batches(cfg, data, epochs, initial_epoch=0):
    """(tf.data of the training batches from `initial_epoch` to `epochs`, steps per epoch):
    order and augmentation depend only on (seed, epoch), so a resumed run sees the same."""
    from keras_arat.data import make_train_dataset
    return make_train_dataset(data, cfg.batch_size, epochs, cfg.seed,
                              initial_epoch=initial_epoch, crop_padding=cfg.crop_padding,
                              flip=cfg.flip_images)


def build(cfg):
    """Everything a run needs before its first step: the workdir (config.json written or
    checked), data, network, trainer, optimizer, checkpoints (restored when resuming) and
    callbacks."""
    strategy = make_strategy(cfg)  # before anything starts the TensorFlow runtime
    # The data before the workdir: a data set that cannot be used leaves nothing behind.
    data, eval_subset = split_holdout(cfg, runs.load_data(cfg))
    policy = set_up_runtime(cfg)
    network, trainer, optimizer, schedule, steps_per_epoch = build_model(cfg, strategy, data)
    swa_state = swa_state_for(cfg, network, steps_per_epoch)
    # The workdir after every check that can refuse the flags: --overwrite deletes the
    # old run only once this one is known to start.
    shared_workdir = cfg.workdir
    cfg, resume = workdir_for(cfg, strategy)
    manager, initial_epoch = restore(cfg, shared_workdir, resume,
                                     runs.checkpoint_objects(trainer, optimizer, swa_state))
    callbacks, stopper, evaluator = make_callbacks(
        cfg, data, network, swa_state, manager, schedule, steps_per_epoch, eval_subset)
    return Training(cfg, shared_workdir, data, network, trainer, optimizer, schedule, manager,
                    swa_state, steps_per_epoch, initial_epoch, callbacks, stopper, evaluator,
                    mixed_precision=bool(policy))


def set_up_runtime(cfg):
    """The seed, op determinism and the dtype policy; returns the policy (None: float32)."""
    import keras
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    policy = config.precision_policy(cfg)
    if policy:
        keras.mixed_precision.set_dtype_policy(policy)
        print(f"mixed precision: {policy} (float32 weights, logits and attack arithmetic)",
              flush=True)
    return policy


def build_model(cfg, strategy, data):
    """(network, trainer, optimizer, schedule, steps per epoch), made in the strategy's
    scope; prints the run's start line on the chief."""
    from keras_arat.training.optim import EpochPiecewiseConstant, TorchSGD
    with strategy.scope():
        network = runs.build_network(cfg, data.num_classes, data.image_shape)
        _, steps_per_epoch = training_batches(cfg, data, 1)
        if is_chief(strategy):
            print(start_line(cfg, data, steps_per_epoch), flush=True)
        trainer = runs.build_trainer(cfg, network, data.image_shape, steps_per_epoch)
        schedule = EpochPiecewiseConstant(steps_per_epoch, cfg.lr_boundaries, cfg.lr_values)
        optimizer = TorchSGD(schedule, momentum=cfg.momentum,
                             l2_weight_decay=cfg.weight_decay)
        trainer.compile(optimizer=optimizer, jit_compile=cfg.jit_compile)
        optimizer.build(trainer.trainable_variables)
    return network, trainer, optimizer, schedule, steps_per_epoch


def swa_state_for(cfg, network, steps_per_epoch):
    """With --swa, the running average of the network's weights (refused when no step
    would be averaged); else None."""
    from keras_arat.training.swa import SWAState
    if not cfg.swa:
        return None
    averaged_steps = (cfg.epochs - cfg.swa_start_epoch + 1) * steps_per_epoch
    if averaged_steps < cfg.swa_every_steps:
        raise errors.UsageError(
            f"--swa_every_steps={cfg.swa_every_steps} exceeds the {averaged_steps} steps "
            f"from epoch {cfg.swa_start_epoch} on: nothing would be averaged")
    return SWAState(network.trainable_variables)


def workdir_for(cfg, strategy):
    """(the config this process writes with, whether to resume). Every worker runs the
    same steps (collectives need all of them); only the chief writes --workdir. The others
    write to a private folder removed at the end and resume from the chief's checkpoints."""
    if is_chief(strategy):
        return cfg, prepare_workdir(cfg)
    resume = prepare_workdir(cfg, write=False)
    cfg = cfg.replace(workdir=tempfile.mkdtemp(prefix="keras_arat_worker_"))
    atexit.register(shutil.rmtree, cfg.workdir, True)
    prepare_workdir(cfg)
    return cfg, resume


def restore(cfg, shared_workdir, resume, objects):
    """(the checkpoint manager of cfg.workdir, the epoch to start from): the latest
    complete checkpoint restored when resuming (a non-chief worker reads the chief's);
    metrics and best checkpoints after it are dropped, to be redone."""
    from keras_arat.training.checkpoint import CheckpointManager
    manager = CheckpointManager(os.path.join(cfg.workdir, "checkpoints"), **objects)
    initial_epoch = 0
    if resume:
        source = manager
        if shared_workdir != cfg.workdir:
            source = CheckpointManager(os.path.join(shared_workdir, "checkpoints"), **objects)
        found = source.latest()
        if found is not None:
            initial_epoch, path = found
            source.restore(path)
            print(f"resuming {shared_workdir} from epoch {initial_epoch}", flush=True)
    trim_metrics(cfg.workdir, initial_epoch)
    manager.discard_after(initial_epoch, "best")  # from after the checkpoint resumed from
    return manager, initial_epoch


def make_callbacks(cfg, data, network, swa_state, manager, schedule, steps_per_epoch,
                   eval_subset):
    """(fit's callbacks in order, the non-finite-loss stopper or None, the evaluation
    during training or None)."""
    from keras_arat.data import a_prev_batches
    from keras_arat.training import callbacks as cb
    from keras_arat.training.swa import SWACallback
    callbacks = []
    if cfg.method == "arat":  # a new augmented subset each epoch, from (seed, epoch)
        callbacks.append(cb.APrevCallback(sample=lambda epoch: a_prev_batches(
            data, cfg.a_prev_examples, cfg.batch_size, cfg.seed, epoch, cfg.crop_padding,
            cfg.flip_images)))
    if swa_state is not None:
        callbacks.append(SWACallback(swa_state, network, cfg.swa_start_epoch,
                                     cfg.swa_every_steps))
    stopper = cb.StopOnNonFinite(steps_per_epoch) if cfg.nan_policy == "stop" else None
    evaluator = None
    if eval_subset is not None:
        evaluator = cb.PeriodicEvaluation(
            lambda: evaluation_figures(cfg, network, *eval_subset), cfg.eval_every_epochs,
            cfg.epochs, cfg.workdir, manager, cfg.keep_best,
            label={"eps": cfg.eps, "data": cfg.eval_during_training_on,
                   "n_examples": len(eval_subset[1])})
    # Order matters: an epoch's figures (and a best checkpoint) come before its epoch
    # checkpoint, so a run killed in between redoes both when it resumes.
    logger = cb.MetricsLogger(cfg.workdir, schedule, every_steps=cfg.tensorboard_every_steps,
                              steps_per_epoch=steps_per_epoch)
    callbacks += [c for c in (stopper, logger, evaluator,
                              cb.CheckpointCallback(manager, {"method": cfg.method})) if c]
    if fit_verbosity(cfg) == 2:  # a log: Keras prints a line per epoch; ours come in between
        callbacks.append(cb.ProgressLines(steps_per_epoch, cfg.epochs))
    return callbacks, stopper, evaluator


def fit_verbosity(cfg):
    """Keras fit's verbose: --verbose, or with auto a progress bar on a terminal and a line
    per epoch in a piped log."""
    return (1 if sys.stdout.isatty() else 2) if cfg.verbose == "auto" else int(cfg.verbose)


def fit(training):
    """Train from the resumed epoch to --epochs (checkpoints each epoch); stops with
    NonFiniteLossError under --nan_policy=stop. Returns the final epoch."""
    from keras_arat.training import callbacks as cb
    cfg = training.cfg
    verbose = fit_verbosity(cfg)
    if training.initial_epoch < cfg.epochs:
        dataset, _ = training.batches(cfg.epochs, training.initial_epoch)
        training.trainer.fit(dataset, epochs=cfg.epochs, initial_epoch=training.initial_epoch,
                             steps_per_epoch=training.steps_per_epoch,
                             callbacks=training.callbacks, verbose=verbose,
                             shuffle=False)  # order and augmentation come from (seed, epoch)
    if training.stopper is not None and training.stopper.error:
        raise cb.NonFiniteLossError(training.stopper.error)
    return max(training.initial_epoch, cfg.epochs)


def finish(training, final_epoch):
    """The final evaluation (results.json), the best checkpoint's figures, and with --swa
    the averaged model (BN re-estimated, saved, evaluated). Returns results.json's dict."""
    import keras

    cfg, network, trainer, swa_state = (training.cfg, training.network, training.trainer,
                                        training.swa_state)
    data = training.data
    if training.mixed_precision:  # evaluate (and re-estimate SWA's BN) in float32
        keras.mixed_precision.set_dtype_policy("float32")
        trained = network
        network = runs.build_network(cfg, data.num_classes, data.image_shape)
        network.set_weights(trained.get_weights())
    run = runs.Run(cfg, data, network, trainer, final_epoch)
    final_evaluation(run, "final")
    if training.evaluator is not None and cfg.keep_best != "none":
        best = training.evaluator.best_record()
        if best is not None:
            results.merge_results(cfg.workdir, {"best": best})
    if swa_state is not None:
        finish_swa(training, run, final_epoch)
    return files.read_json(os.path.join(cfg.workdir, "results.json"))


def finish_swa(training, run, final_epoch):
    """The averaged weights into the network, both branches' BN statistics re-estimated
    for them, saved as checkpoints/swa-N and evaluated into results.json's "swa"."""
    from keras_arat.training.swa import reestimate_branches
    cfg, network, trainer, swa_state = (run.config, run.network, training.trainer,
                                        training.swa_state)
    swa_state.copy_to(network.trainable_variables)
    n_batches = reestimate_branches(
        network, lambda: training.batches(final_epoch + 1, final_epoch)[0],
        trainer.attack, cfg.split_bn, cfg.seed)
    if trainer.network is not network:  # mixed precision: the checkpoint holds trainer's
        trainer.network.set_weights(network.get_weights())
    n_averaged = int(swa_state.count.numpy())
    training.manager.save(final_epoch, {"swa": True, "n_averaged": n_averaged},
                          prefix="swa")
    swa = final_evaluation(run, "final_swa")
    results.merge_results(cfg.workdir, {
        "swa": {"clean_acc": swa["clean_acc"], "pgd20_acc": swa["pgd20_acc"],
                "clean_acc_clean_branch": swa["clean_acc_clean_branch"],
                "n_averaged": n_averaged, "bn_reestimation_batches": n_batches["adv"],
                "bn_reestimated": sorted(n_batches),
                "checkpoint": f"checkpoints/swa-{final_epoch:04d}"}})


def train(cfg):
    """Train a run (a RunConfig) and evaluate it: build, fit, finish. Returns results.json's
    dict."""
    training = build(cfg)
    return finish(training, fit(training))


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def check_tf_config():
    """The parsed TF_CONFIG of a multi-worker run, or a UsageError saying what is wrong."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise errors.UsageError("--strategy=multi_worker needs TF_CONFIG, e.g. "
                              '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                              '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
        members = config["cluster"].get(task["type"], [])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise errors.UsageError(f"TF_CONFIG is not a valid cluster description ({e!r})") \
            from None
    if not isinstance(workers, list) or not 0 <= index < len(members):
        raise errors.UsageError(f"TF_CONFIG's task {task} is not in its cluster "
                              f"{config['cluster']}")
    return config


def make_strategy(cfg):
    """The tf.distribute strategy named by --strategy (with --cpu_devices logical CPUs)."""
    import tensorflow as tf
    if cfg.strategy == "multi_worker":
        if cfg.cpu_devices:
            raise errors.UsageError("--cpu_devices goes with --strategy=mirrored; a multi-worker "
                                  "run uses each worker's GPUs, or its CPU")
        check_tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        print(f"strategy multi_worker: {strategy.num_replicas_in_sync} replicas; this is "
              f"{resolver.task_type} {resolver.task_id}"
              f"{' (chief)' if is_chief(strategy) else ''}", flush=True)
        return strategy
    if cfg.cpu_devices:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_devices)
    if cfg.strategy == "default":
        return tf.distribute.get_strategy()
    devices = None
    if cfg.cpu_devices and not tf.config.list_physical_devices("GPU"):
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    print(f"strategy {cfg.strategy}: {strategy.num_replicas_in_sync} replicas", flush=True)
    return strategy


def evaluation_figures(cfg, network, x, y):
    """Clean and PGD-20 accuracy of the adv branch on (x, y), at the run's full eps, as the
    final evaluation measures them (with the run's reference_noise_leak, the official
    code's PGD-20 too, as pgd20_leak_acc)."""
    from keras_arat.evaluation import evaluate_network, with_leak
    start = time.time()
    leak = bool(cfg.reference_noise_leak)
    accs = evaluate_network(network, x, y, cfg.eps, ("adv",),
                            with_leak(("clean", "pgd20"), leak), cfg.eval_batch_size,
                            cfg.seed)["adv"]
    figures = {"clean_acc": accs["clean"], "pgd20_acc": accs["pgd20"], "n_examples": len(x),
               "eps": cfg.eps, "reference_noise_leak": leak}
    if leak:
        figures["pgd20_leak_acc"] = accs["pgd20-leak"]
    return {**figures, "eval_time_s": round(time.time() - start, 3)}


def final_evaluation(run, split):
    """Clean accuracy through both branches and PGD-20 through adv, on the test set.

    split "final" writes results.json's main figures; any other split (the SWA model)
    only returns them. Either way one metrics.jsonl line records them.
    """
    import tensorflow as tf

    from keras_arat.evaluation import attack_settings, evaluate_network, with_leak
    from keras_arat.training import callbacks as cb
    cfg, network = run.config, run.network
    start = time.time()
    x_test, y_test = run.test_arrays(cfg.eval_examples)
    from keras_arat.progress import log
    log(f"{'final' if split == 'final' else 'SWA'} evaluation on the first {len(x_test)} test "
        f"images, eps {cfg.eps:.4g}: clean and PGD-20 accuracy of the adv branch"
        + (", clean accuracy of the clean branch" if cfg.split_bn else ""))
    attacks = with_leak(("clean", "pgd20"), cfg.reference_noise_leak)
    evaluation = evaluate_network(network, x_test, y_test, cfg.eps, ("adv",), attacks,
                                  cfg.eval_batch_size, cfg.seed, progress=True)
    if cfg.split_bn:
        evaluation.update(evaluate_network(network, x_test, y_test, cfg.eps, ("clean",),
                                           ("clean",), cfg.eval_batch_size, cfg.seed))
    else:  # one BN: both branches are the same network
        evaluation["clean"] = {"clean": evaluation["adv"]["clean"]}
    figures = {"clean_acc": evaluation["adv"]["clean"], "pgd20_acc": evaluation["adv"]["pgd20"],
               "clean_acc_clean_branch": evaluation["clean"]["clean"], "n_examples": len(x_test),
               "eps": cfg.eps}
    if "pgd20-leak" in attacks:
        figures["pgd20_leak_acc"] = evaluation["adv"]["pgd20-leak"]
    if split == "final":
        results.update_results(cfg.workdir, run, evaluation, len(x_test), attacks={
            name: attack_settings(name, cfg.eps, seed=cfg.seed) for name in attacks[1:]})
    cb.append_metrics(os.path.join(cfg.workdir, "metrics.jsonl"),
                      {"split": split, "epoch": run.epoch, **figures,
                       "eval_time_s": round(time.time() - start, 3)},
                      tf.summary.create_file_writer(os.path.join(cfg.workdir, "tensorboard")))
    return figures


def start_line(cfg, data, steps_per_epoch):
    """What is about to be trained, where, on what: one line."""
    shape = "x".join(map(str, data.image_shape))
    model = cfg.model + (" (split BN)" if cfg.split_bn else "")
    return (f"training {cfg.method} in {cfg.workdir}: data {cfg.dataset} "
            f"({len(data.x_train)} train / {len(data.x_test)} test images, {shape}, "
            f"{data.num_classes} classes), model {model}, {cfg.epochs} epochs of "
            f"{steps_per_epoch} steps (batch {cfg.batch_size}), eps {cfg.eps:.4g}")

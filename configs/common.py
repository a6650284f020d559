"""Settings shared by the configs: the small CNN on scikit-learn's digits."""
import ml_collections


def base():
  """The default run: small CNN, digits, SGD with cosine decay, PGD evaluation."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name="digits", data_dir="")
  c.model = dict(name="small_cnn", width=16)
  c.objective = "natural"
  c.batch_size = 64
  c.epochs = 20
  c.optimizer = dict(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, schedule="cosine", warmup_steps=50)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.eval = dict(batch_size=500, limit=0, attacks=dict(
      pgd_linf=dict(name="pgd", norm="linf", eps=0.2, step_size=0.02, steps=20),
      pgd_l2=dict(name="pgd", norm="l2", eps=1.0, step_size=0.1, steps=20)))
  return c

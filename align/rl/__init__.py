"""The online-RL toolkit: the parts every algorithm that learns from its own samples shares.

PPO, GRPO, RLOO and REINFORCE++ are one loop (:mod:`align.rl.loop`) over these blocks; they differ by a
registered advantage estimator (:mod:`align.rl.advantages`), whether a critic trains, and how the loss is
aggregated (:mod:`align.rl.loss`). A third-party stage may use the loop as the built-in ones do, or
compose the blocks into a loop of its own:

==============================  ================================================================
module                          holds
==============================  ================================================================
:mod:`align.rl.prompts`         :class:`~align.rl.prompts.PromptSampler`: prompts in seeded epochs, resumable
:mod:`align.rl.batch`           :class:`~align.rl.batch.RolloutBatch`: one iteration's responses, typed
:mod:`align.rl.forward`         log-probs at the sampling temperature, values, the reference, in chunks
:mod:`align.rl.scoring`         :class:`~align.rl.scoring.Scorer`: reward model and reward functions
:mod:`align.rl.kl`              KL estimators (k1, k3) and controllers (fixed, adaptive)
:mod:`align.rl.masked`          means, variances and whitening over response tokens
:mod:`align.rl.advantages`      :class:`~align.rl.advantages.AdvantageEstimator` and GAE
:mod:`align.rl.loss`            the clipped policy loss, the value loss, the KL loss, aggregation
:mod:`align.rl.checkpoint`      :class:`~align.rl.checkpoint.Checkpoints`: RL state, versioned, written whole
:mod:`align.rl.loop`            :class:`~align.rl.loop.OnlineRLStage`: the loop, as a stage base class
==============================  ================================================================
"""

__all__: list[str] = []

"""EntityCLIP's objective as pure functions: VTC, GI-ITM with hard negatives, the loss of one batch."""

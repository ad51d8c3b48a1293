"""GluonTS's ``Callback`` hook protocol, for when GluonTS is not installed.

Every hook a trainer may call exists and does nothing; boolean hooks return True (continue training).
"""

from __future__ import annotations

from typing import Any


class Callback:
    def on_train_start(self, max_epochs: int) -> None:
        pass

    def on_network_initializing_end(self, training_network: Any) -> None:
        pass

    def on_train_epoch_start(self, training_network: Any) -> None:
        pass

    def on_train_batch_start(self, training_network: Any) -> None:
        pass

    def on_validation_batch_start(self, training_network: Any) -> None:
        pass

    def on_validation_epoch_start(self, training_network: Any) -> None:
        pass

    def on_train_batch_end(self, training_network: Any) -> bool:
        return True

    def on_validation_batch_end(self, training_network: Any) -> bool:
        return True

    def on_train_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: Any, trainer: Any) -> bool:
        return True

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: Any, trainer: Any) -> bool:
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: Any, trainer: Any,
                     best_epoch_info: Any = None, ctx: Any = None) -> bool:
        return True

    def on_train_end(self, training_network: Any, temporary_dir: Any = None, ctx: Any = None) -> None:
        pass

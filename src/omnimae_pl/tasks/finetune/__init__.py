"""Fine-tuning, linear probing and evaluation of an OmniMAE classifier, and the pieces only they use.

* :mod:`.module` - :class:`OmniMAEFinetune`, the LightningModule the configs name;
* :mod:`.mixup` - :class:`VideoMixup`, batch-level Mixup / CutMix for images and clips;
* :mod:`.multiview` - logits averaged over the views of one sample, de-duplication by sample index;
* :mod:`.metrics` - :class:`DedupTopKAccuracy`, top-k over distinct samples.
"""

from omnimae_pl.tasks.finetune.metrics import DedupTopKAccuracy
from omnimae_pl.tasks.finetune.mixup import VideoMixup
from omnimae_pl.tasks.finetune.module import OmniMAEFinetune
from omnimae_pl.tasks.finetune.multiview import average_logits_by_id, first_occurrence

__all__ = ["DedupTopKAccuracy", "OmniMAEFinetune", "VideoMixup", "average_logits_by_id", "first_occurrence"]

"""The image task: image folders and CIFAR-10 batches, pretraining and fine-tuning (with the frozen-backbone
head fit for small data), and the ``pretrain-image`` and ``finetune-image`` commands."""

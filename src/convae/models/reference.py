"""The lecture's code as it was shown on screen, kept verbatim for comparison, and its reported figures.

convae's own models live in :mod:`convae.models`; these two classes are the yardstick: the
tests check that the ``seed`` preset matches them layer by layer, and the benchmarks time them.
"""

import torch.nn as nn

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The lecture's reported figures (one GPU, its CIFAR-10 test split), shown beside a run of its setting.
LECTURE = {
    "pretrain_loss": [0.148, 0.053, 0.039],  # averaged with a 60000-image denominator
    "finetune_accuracy": [38.23, 45.76, 50.10, 52.13, 55.72],
    "per_class": dict(zip(CIFAR10, [66.0, 68.1, 41.3, 32.4, 31.8, 58.0, 72.8, 69.3, 63.3, 62.2])),
}


class autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_encoder = nn.Sequential(
            nn.Conv2d(in_channels=3, out_channels=64, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(in_channels=64, out_channels=128, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(in_channels=128, out_channels=128, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.1),
        )
        self.fc_encoder = nn.Sequential(nn.Linear(128 * 4 * 4, 1024), nn.LeakyReLU(0.1))
        self.fc_decoder = nn.Sequential(nn.Linear(1024, 128 * 4 * 4), nn.LeakyReLU(0.1))
        self.conv_decoder = nn.Sequential(
            nn.Conv2d(in_channels=128, out_channels=128, kernel_size=3, stride=1, padding=1),
            nn.LeakyReLU(0.1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(in_channels=128, out_channels=64, kernel_size=3, stride=1, padding=1),
            nn.LeakyReLU(0.1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(in_channels=64, out_channels=64, kernel_size=3, stride=1, padding=1),
            nn.LeakyReLU(0.1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(in_channels=64, out_channels=3, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
        )

    def forward(self, x):
        x = self.conv_encoder(x)
        x = x.view(-1, 128 * 4 * 4)
        x = self.fc_encoder(x)
        x = self.fc_decoder(x)
        x = x.view(-1, 128, 4, 4)
        x = self.conv_decoder(x)
        return x


class Model(nn.Module):
    """The lecture's classifier: the autoencoder's conv and fc encoder plus Linear(1024 -> 10)."""

    def __init__(self, net):
        super().__init__()
        self.conv = net.conv_encoder
        self.fc1 = net.fc_encoder
        self.fc2 = nn.Sequential(nn.Linear(1024, 10))

    def forward(self, x):
        x = self.conv(x)
        x = x.view(-1, 128 * 4 * 4)
        x = self.fc1(x)
        x = self.fc2(x)
        return x

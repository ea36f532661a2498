"""The ImageNet networks of Sec. 4.2: BN-Inception (Figure 5) and GoogLeNet."""

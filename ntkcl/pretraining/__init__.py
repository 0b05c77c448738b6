"""Formula-driven images (`fractals`, `contours`, with what they share in `rendering`) and the script that
pre-trained the shipped `ntkcl-tiny-fdsl` (`pretrain`)."""

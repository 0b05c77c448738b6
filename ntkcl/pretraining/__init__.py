"""Formula-driven images (`fractals`, `contours`) and the script that pre-trained the shipped `ntkcl-tiny-fdsl`
(`pretrain`)."""

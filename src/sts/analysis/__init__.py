"""What relates scores to measured outcomes: correlations with intervals, the swap test and
own-domain ranks (`correlation`), the library of measured runs and its shared / own split
(`library`), and calibration into a metric's units (`calibration`). Prediction reads the library
and calibration; validation writes them.
"""

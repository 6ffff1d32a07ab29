"""Calibrate: the text and the token windows statistics are collected on."""

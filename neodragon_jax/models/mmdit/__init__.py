"""models/mmdit"""

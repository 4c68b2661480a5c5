"""models/vae"""

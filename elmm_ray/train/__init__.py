"""elmm_ray.train"""

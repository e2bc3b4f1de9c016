"""Streamlit UI for Model Interpret Explorer: the only package besides pages/ that imports streamlit."""
